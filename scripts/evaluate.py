from hvae_diffusion.commands import evaluate_cli

if __name__ == "__main__":
    evaluate_cli()
