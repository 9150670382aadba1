#!/usr/bin/env python
from hvae_diffusion.commands.train_vae import main

main()
