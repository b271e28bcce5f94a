from setuptools import setup

setup(
    name="cimfast",
    version="0.1.0",
    description="Fast Corrupted Image Modeling (CIM) self-supervised pre-training",
    python_requires=">=3.10",
    packages=["cimfast", "cimfast.config", "cimfast.engine", "cimfast.evaluation", "cimfast.models",
              "cimfast.objective", "cimfast.tokenizer", "cimfast.kernels", "cimfast.pipelines", "cimfast.configs"],
    # kernels/ and pipelines/ sit at the top of the repository (each can be tested and
    # benchmarked alone) but install inside the package, as cimfast.kernels and
    # cimfast.pipelines: nothing named `kernels` or `pipelines` lands at the top of a
    # user's site-packages (a PyPI package named `kernels` exists). Code imports them as
    # `from cimfast.kernels import ...`; an editable install (pip install -e .) maps them.
    # configs/ likewise installs as cimfast.configs, so an installed cimfast finds its shipped
    # DeepSpeed configs with importlib.resources, wherever it is installed.
    package_dir={"cimfast": "cimfast", "cimfast.kernels": "kernels", "cimfast.pipelines": "pipelines",
                 "cimfast.configs": "configs"},
    package_data={"cimfast": ["assets/*.safetensors", "assets/*.json"], "cimfast.configs": ["*.json"]},
    install_requires=[
        "torch>=2.4",
        "triton>=3.0; platform_system == 'Linux'",
        "deepspeed>=0.16",
        "numpy>=1.24",
        "safetensors>=0.4",
        "tqdm>=4.60",
        "tensorboard>=2.12",
        "pillow>=9.0",
        "timm>=1.0",  # fine-tuning (transforms, mixup, losses, layer decay), timm-named weights
        "torchvision>=0.19",
        "scikit-learn>=1.2",  # the demo's labelled digits and sample photos
        "matplotlib>=3.6",
        "scikit-image>=0.21",  # its sample photographs are the demo data
    ],
    extras_require={
        # DALI: pick the build that matches the CUDA major version of your torch.
        "dali-cuda13": ["nvidia-dali-cuda130>=1.50"],
        "dali-cuda12": ["nvidia-dali-cuda120>=1.40"],
        "xformers": ["xformers>=0.0.28"],
        "dev": ["pytest>=7", "pytest-benchmark>=4", "psutil>=5.9"],
    },
    entry_points={"console_scripts": ["cimfast-train=cimfast.train:cli", "cimfast-export=cimfast.export:main",
                                      "cimfast-evaluate=cimfast.evaluate:cli", "cimfast-finetune=cimfast.finetune:cli"]},
)
