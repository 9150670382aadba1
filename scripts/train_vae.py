from hvae_diffusion.commands import train_vae_cli

if __name__ == "__main__":
    train_vae_cli()
