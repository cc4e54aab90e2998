"""Chat formats: the conversation model and the templates that turn it into token ids and labels."""
