package ai.onnxruntime;
public class TensorInfo implements ValueInfo {
  public final OnnxJavaType type = null;
  public long[] getShape() { return null; }
}
