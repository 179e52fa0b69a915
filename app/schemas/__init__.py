"""Wire schemas: what the API accepts and answers (never the table classes)."""
