from hvae_diffusion.commands import train_cli

if __name__ == "__main__":
    train_cli()
