"""Our CUDA kernels. Each kernel has a pure-PyTorch reference with the same signature; the kernels are
JIT-compiled on first use (``jit.load_extension``) and the reference is used when there is no GPU or the
build fails."""
