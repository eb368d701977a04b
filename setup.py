"""rlhf_jax: JAX-native RLHF research code."""
import setuptools

setuptools.setup(
    name="rlhf_jax",
    version="0.1.0",
    description="JAX-native post-training: SFT, reward models, PPO, DPO.",
    packages=setuptools.find_packages(include=["rlhf_jax*", "experiments*", "configs*", "benchmarks*"]),
    python_requires=">=3.11",
    install_requires=[
        "jax>=0.7.0",
        "flax>=0.11.0",
        "optax>=0.2.5",
        "orbax-checkpoint>=0.11.20",
        "tensorflow-datasets>=4.9.9",
        "grain>=0.2.12",
        "array-record>=0.8.1",
        "chex>=0.1.90",
        "ml-collections>=1.1.0",
        "absl-py>=2.1.0",
        "numpy>=1.26",
        "tokenizers>=0.21",
        "vaderSentiment>=3.3.2",
        "tensorboardX>=2.6.2",
        "safetensors>=0.5",
        "matplotlib>=3.8",
    ],
    extras_require={
        "test": ["pytest>=8.0", "pytest-xdist>=3.6"],
        # Hugging Face parity tests and export checks (CPU torch is enough). Pinned: the
        # machines' pip finds torch 2.13.0's CPU wheel locally, and any other torch version
        # would come from PyPI as a multi-GB CUDA build; transformers as tested with it.
        "hf": ["torch==2.13.0", "transformers>=5.0,<=5.24.0"],
    },
)
