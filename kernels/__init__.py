"""Triton kernels of t2t-fast, installed as ``t2t_fast.kernels``: one file per op.

Each file exposes host functions ``forward(...)`` and ``backward(...)`` with the operator contract documented
in ``t2t_fast/ops/<op>.py``; autograd and dispatch live there, not here.
"""
