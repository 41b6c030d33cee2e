"""genkern: fused Triton and CUDA C++ kernels for diffusion models and GANs.

    import genkern
    y = genkern.group_norm_silu(x, num_groups=32, weight=w, bias=b)   # act(GroupNorm(x)), fused
    layer = genkern.nn.GroupNormSiLU(32, 256)                          # drop-in for GroupNorm + SiLU
    x = genkern.diffusion.DDIMScheduler().step(eps, t, x, seed=0)     # fused sampling step, in-kernel noise
    loss = genkern.gradient_penalty(critic, real, fake, weight=10.0)  # WGAN-GP, fused norm + penalty
    report = genkern.patch(model)                                      # fuse GroupNorm+SiLU in place
    genkern.backends()                                                 # what can run here
    with genkern.use_backend("triton"): ...                            # force an implementation
"""
from . import _extension  # noqa: F401  (loads genkern._C or warns once)
from ._backend import backends, current_backend, use_backend
from .ops import (add_noise, ddpm_step, gradient_norm_penalty, gradient_penalty, group_norm_silu, minibatch_stddev,
                  pixel_norm, r1_penalty)
from . import diffusion, nn, reference
from .patch import PatchReport, patch

__version__ = "0.1.0"

__all__ = ["backends", "current_backend", "use_backend", "add_noise", "ddpm_step", "gradient_norm_penalty",
           "gradient_penalty", "group_norm_silu", "minibatch_stddev", "pixel_norm", "r1_penalty", "diffusion", "nn",
           "patch", "PatchReport", "reference", "__version__"]
