"""The provider edge: WebSocket admission, one reader per connection, serialized writes."""
