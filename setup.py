"""The one build step setup.cfg cannot express: the wheel ships the repository's top-level ``model_card.md`` (the
model card template, which the project's layout keeps at the top) inside the package, as
``hvae_diffusion/model_card.md``, copied from that one file at build time. A checkout or an editable install reads
the top-level file itself (``hvae_diffusion.training.hub.model_card_template``)."""

import os

from setuptools import setup
from setuptools.command.build_py import build_py

MODEL_CARD = "model_card.md"


class BuildPyWithModelCard(build_py):
    # An editable install builds no package folder: it imports the checkout, which reads the top-level file.
    def packaged_model_card(self):
        return (
            []
            if getattr(self, "editable_mode", False)
            else [os.path.join(self.build_lib, "hvae_diffusion", MODEL_CARD)]
        )

    def run(self):
        super().run()
        for target in self.packaged_model_card():
            self.copy_file(MODEL_CARD, target)

    def get_outputs(self, include_bytecode=True):
        return [*super().get_outputs(include_bytecode), *self.packaged_model_card()]


setup(cmdclass={"build_py": BuildPyWithModelCard})
