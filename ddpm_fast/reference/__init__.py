"""The pure-PyTorch definition of every op: the truth every backend is tested against."""

from .attention import attention, attention_block
from .group_norm import group_norm
from .p_step import p_step
from .philox import philox_randn
from .picard import picard_step
from .q_sample import q_sample

__all__ = ["attention", "attention_block", "group_norm", "p_step", "philox_randn", "picard_step", "q_sample"]
