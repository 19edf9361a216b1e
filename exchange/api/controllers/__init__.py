"""HTTP controllers: parse the request, call ONE service function, map the result to a wire Struct."""
