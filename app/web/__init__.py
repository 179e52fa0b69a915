"""Public web pages (no token): the HTML people see from emails and the shop's forms."""
