"""Installs the EG3D code under `eg3d/` as top-level modules (`dnnlib`, `torch_utils`, `training`, `legacy`,
`camera_utils`), the names that EG3D pickles refer to. `pip install -e .` keeps them editable in place."""
from setuptools import find_packages, setup

PACKAGE_DIR = "eg3d"

setup(
    name="eg3d-lora",
    version="0.1.0",
    description="Personalize a frozen EG3D with LoRA/AdaLoRA adapters.",
    python_requires=">=3.9",
    package_dir={"": PACKAGE_DIR},
    packages=find_packages(where=PACKAGE_DIR),
    py_modules=["legacy", "camera_utils"],
    package_data={"torch_utils.ops": ["*.cu", "*.cpp", "*.h"]},
    install_requires=[
        "torch>=2.1",
        "torchvision>=0.16",
        "numpy>=1.23",
        "pillow>=9.0",
        "click>=8.0",
        "safetensors>=0.4",
        "lpips>=0.1.4",
        "tqdm>=4.60",
        "imageio>=2.20",
        "imageio-ffmpeg>=0.4",
        "scipy>=1.9",
        "scikit-image>=0.20",
        "mrcfile>=1.4",
        "psutil>=5.9",
        "dlib-bin>=19.24",
        "face-recognition-models>=0.3.0",
    ],
    extras_require={
        "dev": ["pytest>=7", "peft>=0.10", "selenium>=4.20"],
        "cuda": ["ninja>=1.10"],
    },
)
