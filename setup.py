"""Install one import package, `ipadapter_instruct`, whose parts are the repository's folders.

engine/, kernels/, export/, train/ and bench/ become ipadapter_instruct.engine, .kernels, .export, .train and
.bench (package_dir below): nothing else lands at the top of site-packages, so Hugging Face's `kernels` and any
other `train` or `bench` live beside it. One console script, `ipai`, runs every part's subcommands.

torch is required but deliberately left to the Makefile (or to you): on a machine with no NVIDIA
GPU install the CPU build first (`pip install torch==2.13.0` here) so that this package's
requirements are already satisfied and no multi-GB CUDA build is pulled in.
"""
from setuptools import find_packages, setup

PACKAGE = "ipadapter_instruct"
PARTS = ("engine", "kernels", "export", "train", "bench")

# TensorRT for RTX from the package registry (the full TensorRT's wheels there only download from NVIDIA's index)
TENSORRT = [f"tensorrt-rtx-cu12-{part}==1.7.1.116; platform_system == 'Linux' and platform_machine == 'x86_64'"
            for part in ("libs", "bindings")]
SERVE = ["fastapi>=0.110", "uvicorn>=0.30", "python-multipart>=0.0.9", "prometheus-client>=0.20", "httpx>=0.27",
         "psutil>=5.9"]

setup(
    name="ipadapter-instruct-engine",
    version="0.1.0",
    description="Fast IPAdapter-Instruct and InstructPix2Pix on Stable Diffusion: engine, kernels, export, trainer, bench",
    python_requires=">=3.10",
    packages=[PACKAGE, *(f"{PACKAGE}.{p}" for p in find_packages(include=[f"{part}{sub}" for part in PARTS
                                                                          for sub in ("", ".*")]))],
    package_dir={PACKAGE: PACKAGE, **{f"{PACKAGE}.{part}": part for part in PARTS}},
    # data files: instruction banks, web page, the configs and tokenizer single-file checkpoints load with
    package_data={f"{PACKAGE}.train": ["instructions/*.txt"], f"{PACKAGE}.engine.server": ["static/*"],
                  f"{PACKAGE}.engine": ["configs/*/*.json", "configs/*/*/*.json", "configs/tokenizer/merges.txt"],
                  f"{PACKAGE}.export": ["cpp/*"]},  # the TensorRT plugin and C++ driver sources
    entry_points={"console_scripts": ["ipai = ipadapter_instruct.cli:main"]},
    install_requires=[
        "torch>=2.4",
        "diffusers>=0.35",
        "transformers>=4.45",
        "safetensors>=0.4",
        "accelerate>=0.30",
        "peft>=0.13",  # LoRA: diffusers' loaders inject through it (engine/lora.py)
        "pillow>=9",
        "numpy>=1.24",
        "tqdm>=4.60",
        # the fused kernels; on the CPU they run under TRITON_INTERPRET=1 (wheels are Linux-only)
        "triton>=3.0; platform_system == 'Linux'",
    ],
    extras_require={
        "bench": ["matplotlib>=3.7", "pytest-benchmark>=4"],   # --plot, `pytest bench/ --benchmark-only`
        "train": ["tensorboard>=2.14"],                        # python -m train logs there too when present
        # python -m export onnx / verify (the plugin op runs under ONNX Runtime through its extensions)
        # (+ python -m export trt, and running its plans: TensorRT for RTX, which builds engines without a GPU)
        "export": ["onnx>=1.16", "onnxruntime>=1.18", "onnxruntime-extensions>=0.12", *TENSORRT],
        # python -m engine serve (and engine.client: httpx); --ray adds Ray Serve
        "serve": SERVE,
        "ray": ["ray[serve]>=2.60"],
        # the CPU suite runs the kernels under Triton's interpreter, which needs 3.9 (3.6's fails on loops with
        # run-time bounds; GPU compilation works from 3.6)
        "dev": ["triton>=3.9; platform_system == 'Linux'", "pytest>=8", "pytest-xdist>=3.5", "matplotlib>=3.7", "pytest-benchmark>=4", "tensorboard>=2.14", "onnx>=1.16",
                "onnxruntime>=1.18", "onnxruntime-extensions>=0.12", *SERVE, "ray[serve]>=2.60",
                "selenium>=4.20", *TENSORRT,  # the web page's test drives Debian's chromium through chromedriver
                # Hugging Face's kernels (transformers imports it by that name): tests/test_packaging.py shows the
                # package lives beside it
                "kernels",
                # the clients real users point at the server: OpenAI's SDK and Automatic1111's (tests/test_server_shapes*)
                "openai>=1.0", "webuiapi>=0.9"],
    },
)
