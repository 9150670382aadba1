from hvae_diffusion.commands import toy2d_cli

if __name__ == "__main__":
    toy2d_cli()
