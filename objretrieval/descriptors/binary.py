"""Binary codes packed eight bits to a byte; re-exported from :mod:`objretrieval.models.binary`.

The packing belongs to the binarized AMES model, which owns it, so that :mod:`objretrieval.models` never imports
:mod:`objretrieval.descriptors`; stores and user code find it here too.
"""

from objretrieval.models.binary import pack_bits, signs_from_bits, unpack_bits

__all__ = ["pack_bits", "signs_from_bits", "unpack_bits"]
