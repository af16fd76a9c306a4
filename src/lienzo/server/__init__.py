"""``lienzo serve``: the HTTP server (native, AUTOMATIC1111 and OpenAI APIs) around one job queue."""
