"""Shipping: export a bundle (base + adapters), package it, run it, serve it, check its fidelity."""
