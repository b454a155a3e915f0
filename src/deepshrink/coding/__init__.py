"""Entropy coding of weights: canonical Huffman streams and sparse index coding."""

from deepshrink.coding.huffman import (
    Code,
    StreamInfo,
    decode_stream,
    encode_stream,
    entropy_bits,
    huffman_lengths,
)
from deepshrink.coding.sparse import csr_decode, csr_encode, relative_decode, relative_encode

__all__ = ["Code", "StreamInfo", "csr_decode", "csr_encode", "decode_stream", "encode_stream",
           "entropy_bits", "huffman_lengths", "relative_decode", "relative_encode"]
