"""Distillation: a student trained against a teacher (run), the teachers, evaluation."""
