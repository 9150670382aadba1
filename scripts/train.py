from hvae_diffusion.commands.train import main

if __name__ == "__main__":
    main()
