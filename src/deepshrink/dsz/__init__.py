"""The .dsz file: a checksummed container of entropy-coded tensors plus the architecture spec.

    pack(model, "model.dsz")            # write (atomic); returns a PackReport with coding stats
    deepshrink.load("model.dsz")         # a working nn.Module (via load_dsz)
    unpack("model.dsz", "model.safetensors"); dsz_info("model.dsz")
"""

from deepshrink.dsz.codec import PackConfig
from deepshrink.dsz.format import MAGIC, VERSION, is_dsz, read_container, write_container
from deepshrink.dsz.model import DszContents, PackReport, dsz_info, load_dsz, pack, read_dsz, unpack

__all__ = ["MAGIC", "VERSION", "DszContents", "PackConfig", "PackReport", "dsz_info", "is_dsz",
           "load_dsz", "pack", "read_container", "read_dsz", "unpack", "write_container"]
