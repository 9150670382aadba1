from hvae_diffusion.commands import demo_cli

if __name__ == "__main__":
    demo_cli()
