"""One APIRouter per file: adapters, generate, openai, health."""
