from setuptools import find_packages, setup

setup(
    name="sd-trainer",
    version="0.1.0",
    description="Training toolkit for image diffusion models, command-line compatible with kohya-ss sd-scripts",
    packages=find_packages(include=["library", "library.*", "networks", "networks.*"]),
    python_requires=">=3.10",
)
