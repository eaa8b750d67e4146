"""The TweetBot operator: watches TweetBot resources and runs their stage Jobs."""
