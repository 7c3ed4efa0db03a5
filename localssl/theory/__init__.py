"""Deep linear (and ReLU) networks: when do local-SSL updates equal BP-SSL updates?

The theory of PAPER.md §6, in float64 (run under `with jax.enable_x64(True):`):
  networks.py    bias-free MLPs and stride = kernel CNNs as pure functions, orthogonal or
                 PyTorch-default init, per-layer readouts (pooling for the CNN).
  losses.py      the pairing of PAPER.md §2 and the loss family (softplus, linear, hinge,
                 phyll) written as sums of convex functions of scores t^T B c.
  optimal_b.py   the exact optimal B of a batch (closed form, Newton, or the hinge's dual),
                 with an optimality certificate.
  alignment.py   the protocol: fit B^L globally, copy it, fit every local B^l, and compare
                 local and BP weight updates and errors per layer (cosine similarity).
  data.py        positive pairs from CIFAR-10 (two nearby grayscale crops) or synthetic images.
  experiments.py Fig. 2, 3a, 3b, 4b; `python -m localssl.theory --experiment=fig2 --out=DIR`.
See README.md in this folder for what each experiment shows and the measured numbers.
"""
