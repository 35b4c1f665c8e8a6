"""Train, validate or test a continual learner: python train.py {fit,validate,test} -c CONFIG."""

from cl_lightning.cli import main

if __name__ == "__main__":
    main()
