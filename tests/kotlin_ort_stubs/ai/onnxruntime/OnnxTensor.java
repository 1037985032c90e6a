package ai.onnxruntime;
import java.nio.ByteBuffer;
import java.nio.FloatBuffer;
import java.nio.LongBuffer;
public class OnnxTensor extends OnnxTensorLike {
  public static OnnxTensor createTensor(OrtEnvironment env, LongBuffer data, long[] shape) throws OrtException { return null; }
  public static OnnxTensor createTensor(OrtEnvironment env, ByteBuffer data, long[] shape, OnnxJavaType type) throws OrtException { return null; }
  public FloatBuffer getFloatBuffer() { return null; }
  @Override public Object getValue() throws OrtException { return null; }
  @Override public void close() {}
}
