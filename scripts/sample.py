from hvae_diffusion.commands import sample_cli

if __name__ == "__main__":
    sample_cli()
