from hvae_diffusion.commands.toy2d import main

if __name__ == "__main__":
    main()
