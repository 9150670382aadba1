from hvae_diffusion.commands.train_vae import main

if __name__ == "__main__":
    main()
