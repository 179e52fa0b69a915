"""Delivery of Carnet's changes to emailing tools and webhook receivers."""
