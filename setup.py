"""seqpar: sequence parallelism for softmax, linear and hybrid attention in PyTorch.

The repository keeps `comm/` and `kernels/` at the top level; they install as
`seqpar.comm` and `seqpar.kernels` (never as the bare names `comm` / `kernels`).
"""
from setuptools import find_packages, setup


def _packages(source_dir: str, import_name: str) -> list[str]:
    subpackages = find_packages(where=source_dir)
    return [import_name] + [f"{import_name}.{name}" for name in subpackages]


def _package_dir(source_dir: str, import_name: str) -> dict[str, str]:
    mapping = {import_name: source_dir}
    for name in find_packages(where=source_dir):
        mapping[f"{import_name}.{name}"] = f"{source_dir}/" + name.replace(".", "/")
    return mapping


packages = _packages("seqpar", "seqpar") + _packages("comm", "seqpar.comm") + _packages("kernels", "seqpar.kernels")
package_dir = {**_package_dir("seqpar", "seqpar"), **_package_dir("comm", "seqpar.comm"), **_package_dir("kernels", "seqpar.kernels")}

setup(
    name="seqpar",
    version="0.1.0",
    description="Sequence parallelism (ring, zigzag, striped, all-gather, Ulysses, LASP-2) for softmax and linear attention",
    long_description=open("README.md", encoding="utf-8").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=packages,
    package_dir=package_dir,
    install_requires=[
        "torch>=2.4",
        "triton>=3.0; platform_system == 'Linux'",
        "numpy",
    ],
    extras_require={
        "test": ["pytest>=8", "pytest-timeout"],
        "train": ["tqdm", "matplotlib"],
        "bench": ["tqdm", "matplotlib"],
        "megatron": ["megatron-core==0.16.1"],
        "deepspeed": ["deepspeed==0.19.8"],
        "hf": ["transformers>=5.23,<6"],
    },
    entry_points={"console_scripts": ["seqpar-train=seqpar.train:main", "seqpar-plan=seqpar.plan:main"]},
)
