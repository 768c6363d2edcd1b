"""vlmdet: keep a vision-language object detector trained, measured and published (DESIGN.md)."""
import logging as _logging
import warnings as _warnings

# Two library messages a user can do nothing about, silenced narrowly here, where every vlmdet process
# (the CLI, the flow, the step children) starts:
# - bitsandbytes 0.50 logs a warning at import on CPUs with AVX512-BF16 when the optional `kernels` package
#   (a Hub download of a CPU 4-bit matmul) is missing: vlmdet quantizes on CUDA only. Only that module's
#   logger, below ERROR; remove once bitsandbytes stops warning for an optional CPU kernel.
_logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(_logging.ERROR)
# - PEFT 0.21 and TRL 1.16 read model.is_gradient_checkpointing, which transformers 5 deprecated for
#   is_activation_checkpointing (a FutureWarning at every PeftModel built); remove once they read the new name.
_warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
