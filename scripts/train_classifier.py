from hvae_diffusion.commands.train_classifier import main

if __name__ == "__main__":
    main()
