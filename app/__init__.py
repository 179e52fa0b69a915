"""Carnet: the customer file of an e-commerce business, as an HTTP API."""
