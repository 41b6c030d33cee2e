"""Reference generative models built on genkern's fused layers, runnable as `python -m models.<name>`.

Planned (see the project's issues): a DDPM U-Net with classifier-free guidance, a ProGAN trained with
WGAN-GP, a DCGAN and a convolutional VAE, each with a fused and an eager build of the same weights.
None is here yet; this package only fixes where they will live.
"""
