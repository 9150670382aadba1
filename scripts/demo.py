from hvae_diffusion.commands.demo import main

if __name__ == "__main__":
    main()
