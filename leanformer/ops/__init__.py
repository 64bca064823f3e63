"""Pure-PyTorch kernels, each with a plain reference beside the fast form."""
