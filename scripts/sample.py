from hvae_diffusion.commands.sample import main

if __name__ == "__main__":
    main()
