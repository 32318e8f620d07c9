"""`flglm demo`: a real federated fine-tune against centralized and zero-shot, with a report."""
