import pytest
import torch

import deepshrink as ds
from deepshrink.errors import ModelError
from deepshrink.models import get_spec

IMAGE_MODELS = [("mlp", 28), ("mlp", 8), ("lenet300", 28), ("lenet300", 8), ("lenet5", 28),
                ("resnet_small", 28), ("resnet_small", 8), ("vgg_small", 28), ("vgg_small", 8),
                ("cnn_wide", 28)]


@pytest.mark.parametrize("name,size", IMAGE_MODELS)
def test_reference_model_contract(name, size):
    torch.manual_seed(0)
    m = ds.create_model(name, in_size=size, num_classes=10)
    x = torch.rand(3, 1, size, size)
    out = m(x)
    assert out.shape == (3, 10)
    assert torch.isfinite(out).all()
    out.sum().backward()
    for pname, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname
    assert get_spec(m).name == name and get_spec(m).kwargs["in_size"] == size


def test_normalization_lives_inside_the_model():
    m = ds.create_model("lenet300")
    assert "0.mean" in m.state_dict() and "0.std" in m.state_dict()


def test_lenet5_shapes_match_caffe_variant():
    m = ds.create_model("lenet5")
    shapes = [tuple(p.shape) for n, p in m.named_parameters() if n.endswith("weight")]
    assert shapes == [(20, 1, 5, 5), (50, 20, 5, 5), (500, 800), (10, 500)]
    with pytest.raises(ModelError, match="in_size >= 16"):
        ds.create_model("lenet5", in_size=8)


def test_module_callable_and_errors():
    m = ds.create_model("deepshrink.models.reference:lenet300", in_size=8)
    assert m(torch.rand(2, 1, 8, 8)).shape == (2, 10)
    with pytest.raises(ModelError, match="unknown model 'nope'"):
        ds.create_model("nope")
    with pytest.raises(ModelError, match="no attribute"):
        ds.create_model("deepshrink.models.reference:nope")
    with pytest.raises(ModelError, match="rejected arguments"):
        ds.create_model("mlp", widht=3)


def test_hf_model_from_config_is_seeded():
    pytest.importorskip("transformers")
    cfg = {"model_type": "bert", "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
           "intermediate_size": 64, "vocab_size": 100, "num_labels": 3}
    a = ds.create_model("hf", arch="BertForSequenceClassification", config=cfg, seed=1)
    b = ds.create_model("hf", arch="BertForSequenceClassification", config=cfg, seed=1)
    ids = torch.randint(0, 100, (2, 7))
    assert torch.equal(a(input_ids=ids).logits, b(input_ids=ids).logits)
    with pytest.raises(ModelError, match="model_type"):
        ds.create_model("hf", arch="BertModel", config={"model_type": "vit"})
    for not_a_model in ("pipeline", "AutoConfig", "PreTrainedModel.from_pretrained", "_os"):
        with pytest.raises(ModelError, match="no model class"):
            ds.create_model("hf", arch=not_a_model, config={})
