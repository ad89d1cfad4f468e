"""dayzero: a faithful, portable DeepSeek-V4 runtime."""
