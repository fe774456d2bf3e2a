"""The torch.library ops (namespace ``draftopt``): registration, fake impl, PyTorch reference and the
checked Python wrapper, one file an op. Device code lives in ../triton and ../gluon."""
