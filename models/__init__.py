"""Reference generative models built on genkern's fused layers, runnable as `python -m models.<name>`.

* models/unet.py: the DDPM U-Net (Ho et al. 2020), fused and eager builds of the same weights;
* models/ddpm.py: its training and sampling entry points (`python -m models.ddpm train|sample`);
* models/data.py: real training data without downloads (scikit-learn's digits; local CIFAR-10 or
  image folders); models/ema.py: the weight EMA.

Planned (see the project's issues): a ProGAN trained with WGAN-GP, a DCGAN and a convolutional VAE.
"""
