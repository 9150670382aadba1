from hvae_diffusion.commands import guidance_table_cli

if __name__ == "__main__":
    guidance_table_cli()
