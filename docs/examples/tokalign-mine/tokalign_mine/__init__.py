"""tokalign-mine: the worked examples of tokalign's documentation (docs/plugins/*.md)."""
