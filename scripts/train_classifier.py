from hvae_diffusion.commands import train_classifier_cli

if __name__ == "__main__":
    train_classifier_cli()
