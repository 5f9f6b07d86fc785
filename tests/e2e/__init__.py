"""End-to-end tests against a real Label Studio 1.23 (marked e2e and slow)."""
